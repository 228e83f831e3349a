import inspect

import gputorrent


def test_public_names_match_all() -> None:
    public = {
        name for name, value in vars(gputorrent).items() if not name.startswith("_") and not inspect.ismodule(value)
    }
    assert set(gputorrent.__all__) - {"__version__"} == public
