"""twistd plugin: ``twistd -n smartrelay --config PATH`` (smartrelay.tap, smartrelay.relay)."""

from twisted.application.service import ServiceMaker

smartrelay = ServiceMaker(
    "SmartRelay", "smartrelay.tap", "SmartRelay transactional email relay", "smartrelay"
)
