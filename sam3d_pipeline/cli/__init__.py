"""The command line (`sam3d-pipeline`): the one layer of the library that may start flows."""
