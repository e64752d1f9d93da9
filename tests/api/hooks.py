"""What schemathesis needs to know about herald beyond its OpenAPI document.

Two custom string formats (a cron expression, a Handlebars source) get generators of
valid values, and a few rules that JSON Schema cannot state get applied to the
*positive* cases only: a campaign's event type must have templates for its channels, a
group must exist, a window must end after it starts, a stored template's fields depend on
the channel in its path. Negative cases are left alone, so every refusal is still tested.
"""

import copy
import os
from datetime import datetime

import schemathesis
from hypothesis import strategies as st

# A delivery status notification is a whole MIME message: sent as the text it is.
schemathesis.serializer.alias("message/rfc822", "text/plain")

# A valid DSN (RFC 3464) for a message herald never sent: no schema can describe one.
DSN = (
    "From: MAILER-DAEMON@mx.example.net\r\nTo: herald@localhost\r\n"
    "Message-ID: <dsn-{n}@mx.example.net>\r\nMIME-Version: 1.0\r\n"
    "Content-Type: multipart/report; report-type=delivery-status; boundary=B\r\n\r\n"
    "--B\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.example.net\r\n\r\n"
    "Final-Recipient: rfc822; someone@example.com\r\nAction: failed\r\nStatus: 5.1.1\r\n\r\n"
    "--B\r\nContent-Type: text/rfc822-headers\r\n\r\nMessage-ID: <never-sent-{n}@localhost>\r\n\r\n--B--\r\n"
)

CRONS = ["0 9 * * 1-5", "*/15 * * * *", "@daily", "@hourly", "30 8 1 * *", "0 0 * * 0"]
schemathesis.openapi.format("cron", st.sampled_from(CRONS))
schemathesis.openapi.format(
    "handlebars",
    st.from_regex(r"\A[A-Za-z0-9 ,.!]{0,30}(\{\{payload\.note\}\})?[A-Za-z0-9 ,.!]{0,30}\Z"),
)

# The fixture event type the test app has templates for (email and SMS), and the group
# the test creates before the run.
EVENT_TYPE = "greeting"
CHANNELS = {"email", "sms"}
GROUP = "everyone"
# The user the inbox session of the run names (`HERALD_INBOX_TOKEN`, `HERALD_INBOX_HASH`).
INBOX_USER = "u1"
FIELDS = {
    "email": ["subject", "html", "text"],
    "sms": ["text"],
    "push": ["title", "body", "data"],
    "webhook": ["body"],
    "in_app": ["title", "body", "url", "data"],
}


def storable(value):
    """The value without NUL in its keys: BSON keys are C strings (herald answers 422)."""
    if isinstance(value, dict):
        return {k.replace("\x00", ""): storable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [storable(v) for v in value]
    return value


def positive(case):
    return case.meta is not None and case.meta.generation.mode.is_positive


def instant(text):
    """An RFC 3339 time as a comparable instant (offsets differ; strings do not compare)."""
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        return None


def order_window(body, start="start_at", end="end_at"):
    if isinstance(body.get(start), str) and isinstance(body.get(end), str):
        a, b = instant(body[start]), instant(body[end])
        try:
            ordered = a is not None and b is not None and a < b
        except TypeError:  # one with an offset, one without
            ordered = False
        if not ordered:
            body.pop(end)


def fix_recipients(body, extra=False):
    """Recipients that name someone, through a group that exists."""
    recipients = body.get("recipients")
    if not isinstance(recipients, dict):
        recipients = {}
    if isinstance(recipients.get("group_id"), str):
        recipients["group_id"] = GROUP
    segment = recipients.get("segment")
    if isinstance(segment, dict) and not (segment.get("locale") or segment.get("tag")):
        segment["all"] = True
    named = recipients.get("user_ids") or recipients.get("group_id") or recipients.get("segment")
    if extra and isinstance(body.get("payload"), dict) and body["payload"].get("user"):
        named = True
    if not named:
        recipients["user_ids"] = ["u1"]
    body["recipients"] = recipients


def fix_parts(channel, body):
    """Only the parts of the channel, with the ones it requires."""
    allowed = FIELDS.get(channel, [])
    for key in list(body):
        if key != "locale" and key not in allowed:
            body.pop(key)
    if channel == "email":
        body.setdefault("subject", "Hello")
        if "html" not in body and "text" not in body:
            body["text"] = "Hello"
    elif channel == "sms":
        body.setdefault("text", "Hello")
    elif channel == "push":
        if not ("title" in body or "body" in body):
            body["title"] = "Hello"
        if "data" in body:
            body["data"] = '{"note": "{{payload.note}}"}'
    elif channel == "webhook":
        body["body"] = '{"note": "{{payload.note}}"}'
    elif channel == "in_app":
        if not ("title" in body or "body" in body):
            body["title"] = "Hello"
        if "url" in body:
            body["url"] = "https://example.com/notes/{{payload.note}}"
        if "data" in body:
            body["data"] = '{"note": "{{payload.note}}"}'


def fix_campaign(body, patch=False):
    """A definition whose references exist: event type, channels, group."""
    if "event_type" in body:
        body["event_type"] = EVENT_TYPE
    if isinstance(body.get("channels"), list):
        channels = [c for c in body["channels"] if c in CHANNELS]
        body["channels"] = channels or ["email"]
    if not patch or "recipients" in body:
        fix_recipients(body)
    if patch and ("start_at" in body) != ("end_at" in body):
        # One end of the window alone must stay ordered against the stored other end,
        # which the document cannot know.
        body.pop("start_at", None)
        body.pop("end_at", None)
    order_window(body)


@schemathesis.hook
def map_case(ctx, case):
    if not positive(case):
        return case
    path, method = case.operation.path, case.method.upper()
    if path == "/v1/deliveries" and isinstance(case.query, dict):
        # A cursor is opaque: only one a page handed out is valid.
        case.query.pop("cursor", None)
    if path == "/v1/inbox/session" and isinstance(case.body, dict):
        # A session is for the user whose hash the customer's server computed.
        case.body = {"user_id": INBOX_USER, "user_hash": os.environ["HERALD_INBOX_HASH"]}
        return case
    if path == "/v1/feedback/dsn":
        case.body = DSN.format(n=abs(hash(str(case.body))))
        return case
    if not isinstance(case.body, dict):
        return case
    # The generator may share a body between cases: change a copy.
    case.body = body = storable(copy.deepcopy(case.body))
    if path == "/v1/events":
        fix_recipients(body, extra=True)
        if body.get("schedule") is not None:
            body.pop("send_at", None)
            fix_campaign(body)
    elif path == "/v1/schedules":
        fix_campaign(body)
    elif path == "/v1/schedules/{id}":
        fix_campaign(body, patch=True)
    elif path == "/v1/schedules/preview":
        order_window(body)
    elif path in ("/v1/webhook-endpoints", "/v1/webhook-endpoints/{id}"):
        # An endpoint must be on a public address (herald refuses internal ones).
        if "url" in body:
            body["url"] = "https://example.com/hooks/herald"
    elif path == "/v1/templates/{event_type}/{channel}" and method == "PUT":
        fix_parts(case.path_parameters.get("channel"), body)
    elif path in ("/v1/users/{id}", "/v1/inbox/preferences"):
        prefs = body if path == "/v1/inbox/preferences" else (body.get("preferences") or {})
        quiet = prefs.get("quiet_hours")
        if isinstance(quiet, dict) and quiet.get("start") == quiet.get("end"):
            quiet["end"] = "23:59" if quiet.get("start") != "23:59" else "00:00"
    elif path == "/v1/templates/preview":
        # A render must find its template and every variable it uses (strict mode).
        if isinstance(body.get("draft"), dict):
            fix_parts(body.get("channel"), body["draft"])
        else:
            body["event_type"] = EVENT_TYPE
            if body.get("channel") not in CHANNELS:
                body["channel"] = "email"
        body.setdefault("payload", {})["note"] = "hi"
        body.setdefault("user", {})["first_name"] = "Ana"
    return case
