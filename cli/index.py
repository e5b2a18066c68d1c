"""``patchdb build-index`` and ``patchdb info``: build a patch store and describe one."""

import json
import logging

import click

from cli.options import DATA_DIR, DATASET, OUTPUT_FOLDER, SIZE_LIST_HELP, ScaleSpec, UserPath
from patchdb.build import build_store
from patchdb.data import load_dataset
from patchdb.index import CLUSTER_SIZE, MIN_INDEXED_ENTRIES
from patchdb.patches import PATCH_MACHINES, check_patch_sizes
from patchdb.scales import PATCH_SIZES_HELP, parse_patch_sizes
from patchdb.store import PatchStore


@click.command("build-index")
@DATASET
@DATA_DIR
@click.option("--machine", type=click.Choice(PATCH_MACHINES), default="bbels",
              help="The patch machine whose dictionaries to index.")
@click.option("--scales", type=ScaleSpec(), default="3,5,7,9,11,13,15,17",
              help=f"Patch sizes to index: {SIZE_LIST_HELP}; or {PATCH_SIZES_HELP}.")
@click.option("--conditional", is_flag=True, help="One set of dictionaries per class (for class-conditional sampling).")
@click.option("--labels", default=None, help="With --conditional: only these classes, comma-separated (default: all).")
@click.option("--cluster-size", type=click.IntRange(min=1), default=CLUSTER_SIZE,
              help="Patches (duplicates counted) per k-means cluster of the inverted file.")
@click.option("--min-indexed-entries", type=click.IntRange(min=1), default=MIN_INDEXED_ENTRIES,
              help="Dictionaries with fewer distinct patches are not clustered (the exact backend scans them).")
@click.option("--keep-duplicates", is_flag=True,
              help="Store identical patches as separate entries instead of one entry with its multiplicity (the same "
                   "posterior, a larger store: for checking the merge).")
@click.option("--out", type=OUTPUT_FOLDER, required=True,
              help="Store folder (store.h5, scale-PP.h5); an interrupted build resumes into it.")
def build_index(dataset, data_dir, machine, scales, conditional, labels, cluster_size, min_indexed_entries, keep_duplicates,
                out) -> None:
    """Index a machine's patch dictionaries at every scale (HDF5 store + FAISS k-means clusters) into OUT."""
    logging.basicConfig(format="%(message)s")
    logging.getLogger("patchdb").setLevel(logging.INFO)
    if labels is not None and not conditional:
        raise click.UsageError("--labels selects classes of a --conditional store; add --conditional")
    patch_sizes = parse_patch_sizes(scales, machine)
    check_patch_sizes(patch_sizes, machine)  # before the data loads: every data set is loaded at one size
    data = load_dataset(dataset, data_dir)
    store = build_store(data, machine, patch_sizes, out, conditional=conditional,
                        labels=None if labels is None else _int_list(labels, "--labels"), cluster_size=cluster_size,
                        min_indexed_entries=min_indexed_entries, merge_duplicates=not keep_duplicates)
    click.echo(store.summary())


@click.command("info")
@click.argument("store", type=UserPath(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print everything as JSON.")
@click.option("--verify", is_flag=True,
              help="First read every byte of the store and check its checksums; an error names what is damaged.")
def info(store, as_json, verify) -> None:
    """Print a patch store's settings and sizes."""
    opened = PatchStore(store)
    if verify:
        opened.verify()
        click.echo(f"verified: every dictionary of {store} is present and every checksum matches", err=True)
    click.echo(json.dumps(opened.describe(), indent=2) if as_json else opened.summary())


def _int_list(text: str, option: str) -> list[int]:
    try:
        return [int(item) for item in text.split(",")]
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of integers", param_hint=option) from None
