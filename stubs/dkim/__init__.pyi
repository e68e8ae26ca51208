# Minimal stubs for dkimpy (no type information of its own): what SmartRelay uses.
import re
from collections.abc import Callable, Sequence
from typing import Any, Protocol

class DKIMException(Exception): ...
class InternalError(DKIMException): ...
class KeyFormatError(DKIMException): ...
class MessageFormatError(DKIMException): ...
class ParameterError(DKIMException): ...
class ValidationError(DKIMException): ...
class NaClNotFoundError(DKIMException): ...

class _Hasher(Protocol):
    def update(self, data: bytes, /) -> object: ...

class CanonicalizationPolicy:
    @classmethod
    def from_c_value(cls, c: bytes | None) -> CanonicalizationPolicy: ...
    def to_c_value(self) -> bytes: ...
    def canonicalize_headers(
        self, headers: Sequence[Sequence[bytes]]
    ) -> list[tuple[bytes, bytes]]: ...
    def canonicalize_body(self, body: bytes) -> bytes: ...

RE_BTAG: re.Pattern[bytes]

def rfc822_parse(message: bytes) -> tuple[list[list[bytes]], bytes]: ...
def fold(header: bytes, namelen: int = ..., linesep: bytes = ...) -> bytes: ...
def select_headers(
    headers: Sequence[Sequence[bytes]], include_headers: Sequence[bytes]
) -> list[Sequence[bytes]]: ...
def hash_headers(
    hasher: _Hasher,
    canonicalize_headers: CanonicalizationPolicy,
    headers: Sequence[Sequence[bytes]],
    include_headers: Sequence[bytes],
    sigheader: tuple[bytes, bytes],
    sig: dict[bytes, bytes],
) -> list[Sequence[bytes]]: ...

_DnsFunc = Callable[..., bytes | str | None]

def get_txt(name: bytes, timeout: int = ...) -> bytes | None: ...

class DKIM:
    SHOULD: tuple[bytes, ...]
    FROZEN: tuple[bytes, ...]
    def __init__(
        self,
        message: bytes | None = ...,
        logger: Any = ...,
        signature_algorithm: bytes = ...,
        minkey: int = ...,
        linesep: bytes = ...,
        debug_content: bool = ...,
        timeout: int = ...,
        tlsrpt: bool | str = ...,
    ) -> None: ...
    def sign(
        self,
        selector: bytes,
        domain: bytes,
        privkey: bytes,
        signature_algorithm: bytes | None = ...,
        identity: bytes | None = ...,
        canonicalize: tuple[bytes, bytes] = ...,
        include_headers: Sequence[bytes] | None = ...,
        length: bool = ...,
    ) -> bytes: ...
    def verify(self, idx: int = ..., dnsfunc: _DnsFunc = ...) -> bool: ...
    def present(self) -> bool: ...

def sign(
    message: bytes,
    selector: bytes,
    domain: bytes,
    privkey: bytes,
    identity: bytes | None = ...,
    canonicalize: tuple[bytes, bytes] = ...,
    signature_algorithm: bytes = ...,
    include_headers: Sequence[bytes] | None = ...,
    length: bool = ...,
    logger: Any = ...,
    linesep: bytes = ...,
    tlsrpt: bool | str = ...,
) -> bytes: ...
def verify(
    message: bytes,
    logger: Any = ...,
    dnsfunc: _DnsFunc = ...,
    minkey: int = ...,
    timeout: int = ...,
    tlsrpt: bool | str = ...,
) -> bool: ...
