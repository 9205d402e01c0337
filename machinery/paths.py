"""Where things live on this machine, and how a path is written so that a reader elsewhere can read it."""
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the checkout


def cache_root():
    """Where converted models and fetched data live: $CLP_CACHE, default ~/.cache/clp."""
    return Path(os.environ.get("CLP_CACHE", Path.home() / ".cache" / "clp"))


def shown(path):
    """A path as a reader on another machine can read it (reports and BENCHMARKS.md quote it): a relative path
    as given; an absolute one relative to the repository or as $CLP_DATA/..., $CLP_CACHE/..., ~/... when it
    lies there; any other absolute path as it is."""
    if not Path(path).expanduser().is_absolute():  # as the user gave it: already machine-independent
        return str(path)
    p = Path(path).expanduser()
    roots = [(os.environ.get("CLP_DATA"), "$CLP_DATA"), (cache_root(), "$CLP_CACHE"), (ROOT, None),
             (Path.home(), "~")]
    for root, name in roots:
        if not root:
            continue
        try:
            rel = p.relative_to(Path(root).expanduser().absolute())
        except ValueError:
            continue
        if name is None:
            return str(rel)
        return name if str(rel) == "." else f"{name}/{rel}"
    return str(path)
