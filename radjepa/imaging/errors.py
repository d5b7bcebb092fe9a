"""The one exception an unusable input raises: a stable reason code plus a readable message."""

from __future__ import annotations

__all__ = ["REASONS", "ImageRejected"]

# Stable snake_case codes (quarantine tables, manifests and HTTP 422 bodies use them).
REASONS: frozenset[str] = frozenset(
    {
        "empty",
        "too_large",
        "not_an_image",
        "truncated",
        "multi_frame",
        "no_pixel_data",
        "missing_attribute",
        "unsupported_transfer_syntax",
        "unsupported_photometric",
        "not_2d",
        "too_small",
        "extreme_aspect",
        "blank",
        "decode_error",
        "burned_in_annotation",
        "for_processing",
    }
)


class ImageRejected(ValueError):
    """Bytes that cannot become a contract image. ``message`` never quotes file contents."""

    def __init__(self, reason: str, message: str) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown rejection reason {reason!r}")
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message

    def __reduce__(self) -> tuple[type, tuple[str, str]]:  # picklable across Ray workers
        return (type(self), (self.reason, self.message))
