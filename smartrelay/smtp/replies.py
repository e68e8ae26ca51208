"""SMTP replies with enhanced status codes (RFC 3463), and the ones the listeners send."""

from __future__ import annotations

from attrs import frozen


@frozen
class Reply:
    code: int
    enhanced: str  # "" for the greeting and EHLO lines, which carry none
    text: str

    def lines(self) -> bytes:
        """The reply on the wire; a multi-line text becomes a multi-line reply."""
        texts = self.text.split("\n")
        prefix = f"{self.enhanced} " if self.enhanced else ""
        out = []
        for i, text in enumerate(texts):
            sep = "-" if i < len(texts) - 1 else " "
            out.append(f"{self.code}{sep}{prefix}{text}\r\n")
        return "".join(out).encode("utf-8")

    @property
    def positive(self) -> bool:
        return self.code < 400


OK = Reply(250, "2.0.0", "Ok")
SENDER_OK = Reply(250, "2.1.0", "Sender ok")
RECIPIENT_OK = Reply(250, "2.1.5", "Recipient ok")
RESET_OK = Reply(250, "2.0.0", "Reset ok")
START_DATA = Reply(354, "", "End data with <CR><LF>.<CR><LF>")
BYE = Reply(221, "2.0.0", "Bye")
READY_FOR_TLS = Reply(220, "2.0.0", "Ready to start TLS")
AUTH_OK = Reply(235, "2.7.0", "Authentication successful")
VRFY_REPLY = Reply(252, "2.5.0", "Cannot verify the user, but will accept the message")
HELP_REPLY = Reply(214, "2.0.0", "See RFC 5321; commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT")

NOT_ALLOWED = Reply(554, "5.7.1", "Access denied: your address is not allowed to connect")
TOO_MANY_CONNECTIONS = Reply(421, "4.3.2", "Too many connections, try again later")
TOO_MANY_FROM_CLIENT = Reply(421, "4.7.0", "Too many connections from your address")
TOO_MANY_ERRORS = Reply(421, "4.7.0", "Too many errors, closing connection")
TOO_MANY_AUTH_FAILURES = Reply(421, "4.7.0", "Too many failed authentication attempts")
IDLE_TIMEOUT = Reply(421, "4.4.2", "Idle timeout, closing connection")
DATA_TIMEOUT = Reply(421, "4.4.2", "DATA took too long, closing connection; message not accepted")
SHUTTING_DOWN = Reply(421, "4.3.0", "Service shutting down, try again later")

LINE_TOO_LONG = Reply(500, "5.5.2", "Line too long")
CONTROL_CHARACTERS = Reply(501, "5.5.2", "Control characters are not allowed in arguments")
UNKNOWN_COMMAND = Reply(502, "5.5.1", "Command not recognised")
NOT_IMPLEMENTED = Reply(502, "5.5.1", "Command not implemented")
BAD_SEQUENCE_HELO = Reply(503, "5.5.1", "Send EHLO or HELO first")
BAD_SEQUENCE_MAIL = Reply(503, "5.5.1", "Send MAIL first")
BAD_SEQUENCE_NESTED_MAIL = Reply(503, "5.5.1", "Sender already given; RSET first")
BAD_SEQUENCE_RCPT = Reply(503, "5.5.1", "Send RCPT first")
ALREADY_TLS = Reply(503, "5.5.1", "TLS already active")
ALREADY_AUTHENTICATED = Reply(503, "5.5.1", "Already authenticated")
NO_VALID_RECIPIENTS = Reply(554, "5.5.1", "No valid recipients")
SYNTAX_ERROR = Reply(501, "5.5.4", "Syntax error in parameters or arguments")
BAD_PARAMETER = Reply(555, "5.5.4", "Unsupported MAIL or RCPT parameter")
BAD_ADDRESS = Reply(553, "5.1.3", "Bad address syntax")
NON_ASCII_WITHOUT_SMTPUTF8 = Reply(553, "5.6.7", "Non-ASCII address needs the SMTPUTF8 parameter")
TLS_REQUIRED = Reply(530, "5.7.0", "Must issue a STARTTLS command first")
AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")
AUTH_NEEDS_TLS = Reply(538, "5.7.11", "Encryption required for authentication: STARTTLS first")
AUTH_NOT_AVAILABLE = Reply(502, "5.5.1", "Authentication not available")
AUTH_MECHANISM = Reply(504, "5.5.4", "Unrecognised authentication mechanism")
AUTH_FAILED = Reply(535, "5.7.8", "Authentication credentials invalid")
AUTH_CANCELLED = Reply(501, "5.0.0", "Authentication cancelled")
AUTH_BAD_BASE64 = Reply(501, "5.5.2", "Cannot decode the response (base64)")
TLS_UNAVAILABLE = Reply(454, "4.7.0", "TLS not available")

TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Too many recipients")
MESSAGE_TOO_BIG = Reply(552, "5.3.4", "Message size exceeds the fixed maximum message size")
NUL_IN_MESSAGE = Reply(550, "5.6.0", "Message contains NUL bytes")
BARE_CR_IN_MESSAGE = Reply(550, "5.6.0", "Message contains a bare CR (CR not followed by LF)")
STORAGE_FAILED = Reply(451, "4.3.0", "Temporary storage failure, try again later")
