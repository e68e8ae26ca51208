"""twistd plugin: ``twistd -n smartrelay --config PATH``. The logic lives in smartrelay.tap."""

from twisted.application.service import ServiceMaker

smartrelay = ServiceMaker(
    "SmartRelay", "smartrelay.tap", "SmartRelay transactional email relay", "smartrelay"
)
