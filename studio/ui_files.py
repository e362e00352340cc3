"""Files the page shows (history audio, plots, saved voices, batch outputs) handed to Gradio as cache copies.

The data folder is never in Gradio's `allowed_paths`: anything there would be downloadable by anyone
who can guess a path (`/gradio_api/file=DATA/...`), which would, for instance, let a listening-test
rater fetch batch outputs by system name. Handlers instead return a copy inside Gradio's own upload
cache, which Gradio serves under a content-hash folder. Listening-test raters never get such paths:
their audio comes through the checked routes of `studio/qa_routes.py`.
"""

from __future__ import annotations

from pathlib import Path


def page_copy(path: str | Path | None) -> str | None:
    """A copy of `path` inside Gradio's cache (content-addressed, so repeated calls reuse it), or None.

    The copy keeps the file's name (download buttons show it) under a folder named by the content's hash."""
    if path is None:
        return None
    src = Path(path)
    if not src.is_file():
        return None
    from gradio.processing_utils import save_file_to_cache
    from gradio.utils import get_upload_folder

    return save_file_to_cache(src, get_upload_folder())
