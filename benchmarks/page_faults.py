"""Where a benchmark's page faults come from: cProfile with the process's minor page faults as its clock.

Each function's "time" is the minor page faults (fresh pages touched, file pages mapped) counted while it ran, so the
functions that fault in memory afresh stand out; a builtin's count is the faults of the memory it first touched. Runs
any other benchmark script's Click command with its own arguments, for example:

    python benchmarks/page_faults.py --top 15 --out /tmp/faults.prof -- benchmarks/bench_topk.py --images 60000 \
        --seeds 2 --threads 2 --store runs/stores/bbels-first60000-c1024 \
        --exact-samples runs/bench/exact-60k-2seeds-2threads-6b578ce.pt --setting tol=1e-2

(with saved exact samples, so that only the top-k run is profiled).
"""

import cProfile
import importlib.util
import pstats
import resource
import sys
from pathlib import Path

import click


def minor_page_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


@click.command(context_settings={"ignore_unknown_options": True})
@click.option("--top", type=click.IntRange(min=1), default=20, show_default=True, help="Functions listed, most faults first.")
@click.option("--out", type=click.Path(dir_okay=False), help="Also save the profile here (pstats format).")
@click.argument("script", type=click.Path(exists=True, dir_okay=False))
@click.argument("arguments", nargs=-1, type=click.UNPROCESSED)
def main(top, out, script, arguments):
    """Run SCRIPT's command `main` with ARGUMENTS; print its functions by page faults (own, then with callees)."""
    sys.path.insert(0, str(Path(script).resolve().parent))
    spec = importlib.util.spec_from_file_location("profiled", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    profile = cProfile.Profile(timer=minor_page_faults, timeunit=1.0)
    profile.enable()
    try:
        module.main.main(args=list(arguments), standalone_mode=False)
    finally:
        profile.disable()
        if out:
            profile.dump_stats(out)
        statistics = pstats.Stats(profile)
        print(f"{statistics.total_tt:,.0f} minor page faults in all (the 'seconds' below are page faults)")
        statistics.sort_stats("tottime").print_stats(top)
        statistics.sort_stats("cumulative").print_stats(top)


if __name__ == "__main__":
    main()
