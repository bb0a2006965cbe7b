"""The models of a study, in one frozen shape that every stage takes as it is (Ray too)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ModelSet(BaseModel):
    """Name -> resolved checkpoint path, the base first when there is one.

    The reference model (whose architecture, config and tokenizer the live model and the
    merged output have) is the base, else the first source.
    """

    model_config = ConfigDict(frozen=True)
    paths: dict[str, str] = Field(description="model name -> local checkpoint folder, base first")
    base: str | None = Field(None, description="name of the common base, if the study has one")
    tokenizer_source: str | None = Field(
        None, description="base, union or a model's name: the output vocabulary (evomerge.vocab)"
    )

    @model_validator(mode="after")
    def _base_first(self) -> ModelSet:
        if not self.paths:
            raise ValueError("a model set needs at least one model")
        if self.base is not None and next(iter(self.paths)) != self.base:
            raise ValueError(f"the base {self.base!r} must be the first model")
        return self

    @property
    def reference(self) -> str:
        return self.base or next(iter(self.paths))

    @property
    def sources(self) -> dict[str, str]:
        """The models being merged (every model but the base)."""
        return {n: p for n, p in self.paths.items() if n != self.base}
