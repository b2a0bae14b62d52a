"""The command line (`sam3d-pipeline`): the one layer of the library that may start flows.

The flows and their tasks are folders of the project, not of the installed package (``sam3d_pipeline.project``):
importing the command line puts the project folder on ``sys.path``."""

from sam3d_pipeline.project import put_on_path

put_on_path()
