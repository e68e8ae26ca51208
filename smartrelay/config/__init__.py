"""The SmartRelay config file: TOML, parsed once at start-up into frozen attrs classes.

Three modules: :mod:`~smartrelay.config.model` (the attrs classes, SPEC section 2's defaults),
:mod:`~smartrelay.config.reader` (TOML to those classes: :func:`load_config`,
:func:`parse_config`, :class:`ConfigError`) and :mod:`~smartrelay.config.checks` (the value
checks: domains, URLs, endpoint strings). Import from here: ``from smartrelay.config import X``.
"""

from smartrelay.config.model import (
    Config,
    DatabaseConfig,
    DatabaseEngine,
    DeliveryConfig,
    DeliveryTls,
    DkimAlgorithm,
    DkimKey,
    FeedbackMailbox,
    InboundConfig,
    IPNetwork,
    RetentionConfig,
    RewrapConfig,
    Route,
    ServerConfig,
    SmtpConfig,
    SoftBouncePolicy,
    SuppressionConfig,
    Throttle,
    WebConfig,
    Webhook,
)
from smartrelay.config.reader import (
    CHECKOUT_CONFIG,
    INSTALLED_CONFIG,
    MAX_DELIVERY_PROCESSES,
    ConfigError,
    default_config_path,
    load_config,
    parse_config,
    refuse_unimplemented,
)
from smartrelay.events import EVENT_TYPES  # what [[webhooks]] events accepts

__all__ = [
    "CHECKOUT_CONFIG",
    "EVENT_TYPES",
    "INSTALLED_CONFIG",
    "MAX_DELIVERY_PROCESSES",
    "Config",
    "ConfigError",
    "DatabaseConfig",
    "DatabaseEngine",
    "DeliveryConfig",
    "DeliveryTls",
    "DkimAlgorithm",
    "DkimKey",
    "FeedbackMailbox",
    "IPNetwork",
    "InboundConfig",
    "RetentionConfig",
    "RewrapConfig",
    "Route",
    "ServerConfig",
    "SmtpConfig",
    "SoftBouncePolicy",
    "SuppressionConfig",
    "Throttle",
    "WebConfig",
    "Webhook",
    "default_config_path",
    "load_config",
    "parse_config",
    "refuse_unimplemented",
]
