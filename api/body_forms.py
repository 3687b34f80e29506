"""Bodies that come in several forms told apart by a key, as TGI's serde `untagged` enums and vLLM's
request unions are (`/invocations`, `/vertex` instances, `/tokenize`).

`one_of` builds a pydantic discriminated union whose discriminator is the first key present, so
FastAPI parses, documents (a `oneOf`) and refuses only the chosen form: a bad field is reported as
`<form>.<field>` in TGI's error shape, and a body of no known form is told which keys it needs.
"""

from __future__ import annotations

from typing import Annotated, Any, Union

from pydantic import BaseModel, Discriminator, Tag


def one_of(*forms: tuple[str, str, type[BaseModel]]) -> Any:
    """A union of `(key, form name, model)`: a body is the first form whose key it has."""

    def form_of(value: Any) -> str | None:
        for key, name, model in forms:
            if isinstance(value, dict) and key in value or isinstance(value, model):
                return name
        return None

    keys = ", ".join(f"`{key}` ({name})" for key, name, _ in forms)
    members = tuple(Annotated[model, Tag(name)] for _, name, model in forms)
    return Annotated[Union[members], Discriminator(  # noqa: UP007 - a runtime-built union of several members
        form_of, custom_error_type="body_form", custom_error_message=f"the body must be an object with one of {keys}")]
