"""`python -m sam3d_pipeline.cli`: the command line."""

from sam3d_pipeline.cli.main import main

main()
