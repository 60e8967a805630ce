"""Local web app: explore concept maps in the browser (``conceptattention app``; needs the ``[app]`` extra).

``logic`` holds what the page does as plain functions (tested without a browser); ``ui`` lays it
out with Gradio. Gradio is imported only when the page is built, so the default install stays light.
"""

from __future__ import annotations

from typing import Any

MISSING_GRADIO = "The app needs Gradio, an optional extra: pip install 'conceptattention[app]'"


def require_gradio() -> None:
    """Fail with an install hint when Gradio is not installed."""
    from conceptattention.errors import ConceptAttentionError

    try:
        import gradio  # noqa: F401
    except ImportError:
        raise ConceptAttentionError(MISSING_GRADIO) from None


def build_app(pipe: Any, workdir: Any = None) -> Any:
    """The Gradio page (``gr.Blocks``, queued) for a loaded pipeline; see :mod:`conceptattention.app.ui`."""
    require_gradio()
    from conceptattention.app.ui import build_app as build

    return build(pipe, workdir)


def launch(pipe: Any, host: str = "127.0.0.1", port: int = 7860, block: bool = True) -> Any:
    """Serve the page for ``pipe`` on ``host:port`` (loopback by default, no share link)."""
    require_gradio()
    from conceptattention.app.ui import launch as serve

    return serve(pipe, host=host, port=port, block=block)


__all__ = ["MISSING_GRADIO", "build_app", "launch", "require_gradio"]
