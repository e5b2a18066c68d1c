"""``patchdb fetch-data``: download a named data set from its own site."""

from pathlib import Path

import click

from cli.options import UserPath
from patchdb.data import DATA_ENV_VAR
from patchdb.fetch import FETCHABLE, default_fetch_dir, fetch_dataset


@click.command("fetch-data")
@click.argument("name", type=click.Choice(FETCHABLE))
@click.option(
    "--data-dir",
    type=UserPath(file_okay=False, writable=True),
    default=default_fetch_dir,
    show_default=f"${DATA_ENV_VAR}, else $XDG_CACHE_HOME/patchdb/data, by default ~/.cache/patchdb/data",
    help="Root folder of the data sets; the files go to DATA_DIR/NAME/.",
)
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show a download progress bar.")
def fetch_data(name: str, data_dir: Path, progress: bool) -> None:
    """Download data set NAME (with checks) so that `--data-dir DATA_DIR` or $PATCHDB_DATA finds it.

    Needs the internet. celeba must be downloaded by hand: this prints how.
    """
    folder = fetch_dataset(name, data_dir, progress=progress)
    click.echo(f"{name} is ready in {folder}; use it with --data-dir {data_dir} or {DATA_ENV_VAR}={data_dir}")
