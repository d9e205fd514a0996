from . import packed_linear  # noqa: F401
