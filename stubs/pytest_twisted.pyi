# Type stubs for the parts of pytest-twisted the tests use (the package ships none).
from collections.abc import Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

from twisted.internet.defer import Deferred

_P = ParamSpec("_P")
_T = TypeVar("_T")
_F = TypeVar("_F", bound=Callable[..., Any])

def ensureDeferred(
    f: Callable[_P, Coroutine[Any, Any, _T]],
) -> Callable[_P, Deferred[_T]]: ...
def async_fixture(f: _F) -> _F: ...
def async_yield_fixture(f: _F) -> _F: ...
def blockon(d: Deferred[_T]) -> _T: ...
