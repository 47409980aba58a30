"""The project's errors, for users of ``autoglm.errors``: they live at the bottom layer,
:mod:`autoglm.processors.errors` (importing nothing of the project), and are re-exported here."""

from autoglm.processors.errors import *  # noqa: F401,F403
from autoglm.processors.errors import __all__  # noqa: F401
