"""One Hydra multirun file per paper table or figure: ``trackstar-run -m --config-dir sweeps --config-name NAME``."""

from pathlib import Path

SWEEPS_DIR = Path(__file__).parent

#: Sweeps the quick reproduction runs only when asked (``--tables``), because
#: they cost more than its budget; their world and model are part of the sweep,
#: so quick does not override them. Name -> why.
OPTIONAL_SWEEPS = {
    "table_c1": "counterfactual validation: 159 retrains of the micro model (4–5 min on 2 cores)",
    "scale_study": "Figure 2 at every model size in two training regimes: hours on 2 cores (`trackstar scale-study`)",
    "table1_seeds": "Table 1 over model seeds 1 and 2 (seed 0 is table1's): about 6 minutes on 2 cores",
}


#: Optional sweeps with a world and model of their own: quick does not override them.
OWN_SETTING = ("table_c1", "scale_study")


def swept_keys(name: str) -> set[str]:
    """The config keys sweep ``name`` sweeps (its ``hydra.sweeper.params``)."""
    from omegaconf import OmegaConf

    return set(OmegaConf.load(SWEEPS_DIR / f"{name}.yaml").hydra.sweeper.params)


def sweep_names(optional: bool = True) -> list[str]:
    """Every sweep file's name (without the optional ones if not ``optional``), in the
    order the quick reproduction runs them: the tables (table1 first: it builds the
    shared stages), then the figures, then the optional sweeps."""
    names = [p.stem for p in SWEEPS_DIR.glob("*.yaml") if optional or p.stem not in OPTIONAL_SWEEPS]
    return sorted(names, key=lambda n: (n in OPTIONAL_SWEEPS, n.startswith("figure"), n))
