"""One Hydra multirun file per paper table or figure: ``trackstar-run -m --config-dir sweeps --config-name NAME``."""

from pathlib import Path

from omegaconf import OmegaConf

SWEEPS_DIR = Path(__file__).parent

#: Table 1's method rows, in the paper's order: every gradient row and baseline.
TABLE1_ROWS = ("bm25", "dense", "grad_dot", "grad_cosine", "trak", "exp1", "exp2", "exp3", "exp4", "exp5", "trackstar")

#: The method lists sweep files share, by name: a sweep's axis is ``method: ${ts_rows:NAME}``.
METHOD_ROWS = {
    # Table 1 and the tables that repeat its rows, with the first-order tail-patch reference.
    "table1": (*TABLE1_ROWS, "first_order"),
    # Table C.1 (LDS needs every passage scored): Table 1's rows and the random control.
    "table1_counterfactual": (*TABLE1_ROWS, "random"),
}


def method_rows(name: str) -> tuple[str, ...]:
    """The shared method list ``name`` (see :data:`METHOD_ROWS`)."""
    if name not in METHOD_ROWS:
        raise ValueError(f"${{ts_rows:{name}}}: no such method list; use one of {sorted(METHOD_ROWS)}.")
    return METHOD_ROWS[name]


#: Sweeps the quick reproduction runs only when asked (``--tables``), because
#: they cost more than its budget; their world and model are part of the sweep,
#: so quick does not override them. Name -> why.
OPTIONAL_SWEEPS = {
    "table_c1": "counterfactual validation: 159 retrains of the micro model",
    "scale_study": "Figure 2 at every model size in two training regimes (`trackstar scale-study`)",
    "table1_seeds": "Table 1 over model seeds 1 and 2 (seed 0 is table1's): 24 more runs",
    "oracle": "the tail-patch oracle (ceiling) of Tables 1, 2, A.3-A.7: every passage stepped, about 5 min per corpus",
}


#: Optional sweeps with a world and model of their own: quick does not override them.
OWN_SETTING = ("table_c1", "scale_study")


def swept_keys(name: str) -> set[str]:
    """The config keys sweep ``name`` sweeps (its ``hydra.sweeper.params``)."""
    return set(OmegaConf.load(SWEEPS_DIR / f"{name}.yaml").hydra.sweeper.params)


def sweep_names(optional: bool = True) -> list[str]:
    """Every sweep file's name (without the optional ones if not ``optional``), in the
    order the quick reproduction runs them: the tables (table1 first: it builds the
    shared stages), then the figures, then the optional sweeps."""
    names = [p.stem for p in SWEEPS_DIR.glob("*.yaml") if optional or p.stem not in OPTIONAL_SWEEPS]
    return sorted(names, key=lambda n: (n in OPTIONAL_SWEEPS, n.startswith("figure"), n))
