"""Serving a model over HTTP (``repvgg serve``): the Open Inference Protocol, ``/predict``, metrics and a page, with
dynamic batching ([`create_app`][repvgg.serve.app.create_app], FastAPI and uvicorn from the ``serve`` extra); and
model repositories for Triton and OpenVINO Model Server
([`write_model_repository`][repvgg.serve.repository.write_model_repository]).
"""

from __future__ import annotations

from typing import Any

__all__ = ["create_app"]


def create_app(*args: Any, **kwargs: Any) -> Any:
    """[`repvgg.serve.app.create_app`][repvgg.serve.app.create_app]: imported when called, so that ``repvgg.serve``
    loads without the web stack."""
    from repvgg.serve.app import create_app as create

    return create(*args, **kwargs)
