"""``[[feedback.rules]]`` (SPEC section 2): parsed into FeedbackRule, validated at start-up."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from smartrelay.config import ConfigError, FeedbackRule, load_config, parse_config
from smartrelay.config.reader import MAX_RULE_PATTERN
from tests.support.run import run_twistd, write_config

SPEC_EXAMPLE = """
[[feedback.rules]]                  # operator's bounce rules, tried before the built-in ones
match = "(?i)mailbox is disabled"   # regex on the diagnostic text
status = ""                         # optional: enhanced status prefix it must also have
domain = ""                         # optional: only for this recipient domain
category = "mailbox-inactive"       # a category of section 5
hard = false

[[feedback.rules]]
match = "quota exceeded"
status = "5.2"
domain = "Example.NET"
category = "mailbox-full"

[[feedback.rules]]
match = "no such person"
category = "invalid-recipient"
"""


def rules_of(text: str) -> tuple[FeedbackRule, ...]:
    return parse_config(tomllib.loads(text), "etc/x.toml").feedback_rules


def error_of(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(tomllib.loads(text), "etc/x.toml")
    message = str(info.value)
    assert "\n" not in message
    return message


def test_spec_example_and_defaults(tmp_path: Path) -> None:
    path = write_config(tmp_path, f"sqlite:{tmp_path / 'x.db'}", SPEC_EXAMPLE)
    rules = load_config(path).feedback_rules  # what start-up reads: not refused
    assert rules == (
        FeedbackRule(re.compile("(?i)mailbox is disabled"), "mailbox-inactive", False, "", ""),
        FeedbackRule(re.compile("quota exceeded"), "mailbox-full", False, "5.2", "example.net"),
        # hard defaults to the category's hardness (section 5)
        FeedbackRule(re.compile("no such person"), "invalid-recipient", True, "", ""),
    )
    assert rules_of("") == ()


BAD_RULES = [
    pytest.param(
        'match = "(unclosed"\ncategory = "policy"',
        "feedback.rules[0].match: invalid regex '(unclosed': missing ), unterminated subpattern",
        id="bad-regex",
    ),
    pytest.param(
        'match = "x"\ncategory = "bounced"',
        "feedback.rules[0].category: invalid value 'bounced' (expected 'invalid-recipient' or",
        id="unknown-category",
    ),
    pytest.param(
        'match = "x"\ncategory = "policy"\nhard = "yes"',
        "feedback.rules[0].hard: expected a boolean (true or false), got string 'yes'",
        id="hard-not-boolean",
    ),
    pytest.param(
        'category = "policy"', "feedback.rules[0].match: required key is missing", id="no-match"
    ),
    pytest.param(
        'match = ""\ncategory = "policy"',
        "feedback.rules[0].match: must not be empty",
        id="empty-match",
    ),
    pytest.param(
        'match = "x"', "feedback.rules[0].category: required key is missing", id="no-category"
    ),
    pytest.param(
        'match = "x"\ncategory = "policy"\nstatus = "5.x"',
        "feedback.rules[0].status: invalid status prefix '5.x'",
        id="bad-status",
    ),
    pytest.param(
        'match = "x"\ncategory = "policy"\ndomain = "not a domain"',
        "feedback.rules[0].domain: invalid domain 'not a domain'",
        id="bad-domain",
    ),
    pytest.param(
        'match = "x"\ncategory = "policy"\ncategorie = "x"',
        "feedback.rules[0].categorie: unknown key (did you mean 'category'?)",
        id="unknown-key",
    ),
    pytest.param(
        f'match = "{"a" * (MAX_RULE_PATTERN + 1)}"\ncategory = "policy"',
        f"feedback.rules[0].match: regex too long ({MAX_RULE_PATTERN + 1} characters, at most",
        id="too-long",
    ),
    pytest.param(
        'match = 5\ncategory = "policy"',
        "feedback.rules[0].match: expected a string, got integer 5",
        id="match-not-string",
    ),
]


@pytest.mark.parametrize(("body", "problem"), BAD_RULES)
def test_bad_rule_is_one_line_naming_the_key(body: str, problem: str) -> None:
    message = error_of(f"[[feedback.rules]]\n{body}\n")
    assert message.startswith(f"etc/x.toml: {problem}"), message


def test_the_second_rule_is_named_by_its_index() -> None:
    text = (
        '[[feedback.rules]]\nmatch = "ok"\ncategory = "policy"\n'
        '[[feedback.rules]]\nmatch = "[z-a]"\ncategory = "policy"\n'
    )
    assert error_of(text).startswith("etc/x.toml: feedback.rules[1].match: invalid regex")


def test_rules_must_be_an_array_of_tables() -> None:
    message = error_of('[feedback]\nrules = "x"\n')
    assert message.startswith("etc/x.toml: feedback.rules: expected an array of tables")


def test_twistd_refuses_a_bad_regex_with_one_line(tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        f"sqlite:{tmp_path / 'relay.db'}",
        '[[feedback.rules]]\nmatch = "(?P<x"\ncategory = "policy"\n',
    )
    result = run_twistd(config, tmp_path)  # stdout and stderr together
    assert result.returncode == 1, result.describe()
    assert "Traceback" not in result.stdout
    assert len(result.lines) == 1, result.describe()
    assert result.lines[0].startswith(
        f"smartrelay: {config}: feedback.rules[0].match: invalid regex '(?P<x': "
    ), result.describe()
    assert not (tmp_path / "relay.db").exists()
