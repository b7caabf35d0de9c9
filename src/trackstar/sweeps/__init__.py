"""One Hydra multirun file per paper table or figure: ``trackstar-run -m --config-dir sweeps --config-name NAME``."""

from pathlib import Path

SWEEPS_DIR = Path(__file__).parent


def sweep_names() -> list[str]:
    """Every sweep file's name, in the order the quick reproduction runs them:
    the tables (table1 first: it builds the shared stages), then the figures."""
    names = [p.stem for p in SWEEPS_DIR.glob("*.yaml")]
    return sorted(names, key=lambda n: (n.startswith("figure"), n))
