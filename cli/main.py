"""Entry point of the ``patchdb`` command: one group, one sub-command per module of cli/."""

import click

from patchdb.allocator import retain_freed_memory
from patchdb.errors import PatchdbError
from cli.data import fetch_data
from cli.sample import sample
from cli.train import train
from cli.calibrate import calibrate
from cli.compare import compare
from cli.index import build_index, info


class PatchdbGroup(click.Group):
    """The command group; a PatchdbError from any sub-command is shown as its message (exit status 1), never a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except PatchdbError as error:
            raise click.ClickException(str(error)) from None


@click.group(cls=PatchdbGroup, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(package_name="patchdb")
def main() -> None:
    """Analytic patch-mosaic score machines of Kamb & Ganguli (ICML 2025) and the CNNs they explain."""
    retain_freed_memory(large_blocks=click.get_current_context().invoked_subcommand != "build-index")  # its budget is a cap


main.add_command(sample)
main.add_command(fetch_data)
main.add_command(train)
main.add_command(calibrate)
main.add_command(compare)
main.add_command(build_index)
main.add_command(info)

if __name__ == "__main__":  # python -m cli.main
    main()
