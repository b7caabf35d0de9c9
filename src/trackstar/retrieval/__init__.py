"""The retrieval stage: every method row of the paper's tables behind one registry.

    from trackstar.retrieval import retrieve
    records, info = retrieve("bm25", world, "closed", k=10)
    records, info = retrieve("trackstar", world, "open", checkpoint=ckpt, options={"d": 1024})

``registry`` holds the :class:`Retriever` base class and the registry; ``bm25``,
``dense`` and ``gradient`` register the paper's rows; ``records`` builds and
labels release-schema retrieval records (SPEC §2.1).
"""

from .records import CORPORA, Corpus, label_retrievals, query_text, retrieval_record
from .registry import (
    FAMILIES,
    RetrievalTask,
    Retriever,
    check_method,
    get_retriever,
    register,
    retrieve,
    retriever_class,
    retriever_names,
    run,
    unregister,
)

__all__ = [
    "CORPORA", "FAMILIES", "Corpus", "RetrievalTask", "Retriever", "check_method", "get_retriever",
    "label_retrievals", "query_text", "register", "retrieval_record", "retrieve", "retriever_class", "retriever_names", "run",
    "unregister",
]
