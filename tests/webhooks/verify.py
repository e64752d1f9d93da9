"""Verifies requests herald signed, with the Standard Webhooks reference library (PyPI
`standardwebhooks`), not herald's code.

  verify.py SECRET    reads a JSON list of {"headers": {...}, "body": "<base64>"} on stdin;
                      exits 0 when every request verifies with SECRET (`whsec_...`),
                      else prints why and exits 1
"""

import base64
import json
import sys

from standardwebhooks.webhooks import Webhook, WebhookVerificationError


def main():
    secret = sys.argv[1]
    requests = json.load(sys.stdin)
    hook = Webhook(secret)
    for i, r in enumerate(requests):
        body = base64.b64decode(r["body"])
        try:
            hook.verify(body, r["headers"])
        except WebhookVerificationError as e:
            print(f"request {i}: {e}")
            sys.exit(1)
    print(f"{len(requests)} verified")


main()
