"""Signs provider feedback the way the providers do, for herald's tests, and checks each
signature with the provider's or a third party's verifier before handing it over.

  sns-keygen DIR              an RSA key and a self-signed certificate (SNS's signing cert)
  sns-sign DIR MESSAGES       signs a JSON list of SNS messages (SignatureVersion 1 or 2);
                              each is verified by sns_message_validator (PyPI), which
                              fetches the certificate from its SigningCertURL
  sendgrid-keygen DIR         an ECDSA P-256 key; prints the verification key as SendGrid
                              shows it (base64 DER)
  sendgrid-sign DIR TS BODY   SendGrid's signature of TS + BODY, verified by SendGrid's
                              own EventWebhook helper (the `sendgrid` package)
"""

import base64
import datetime
import json
import os
import sys

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID


def sns_keygen(d):
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sns.test.herald")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    with open(os.path.join(d, "sns-key.pem"), "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    with open(os.path.join(d, "sns-cert.pem"), "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))


def sns_sign(d, messages):
    from sns_message_validator import SNSMessageValidator

    with open(os.path.join(d, "sns-key.pem"), "rb") as f:
        key = serialization.load_pem_private_key(f.read(), password=None)
    out = []
    for m in messages:
        version = m["SignatureVersion"]
        validator = SNSMessageValidator(cert_url_regex=r"^http://127\.0\.0\.1:\d+/",
                                        signature_version=version)
        # The string to sign as the third-party validator builds it.
        plaintext = validator._get_plaintext_to_sign(m).encode()
        digest = hashes.SHA1() if version == "1" else hashes.SHA256()
        m["Signature"] = base64.b64encode(key.sign(plaintext, padding.PKCS1v15(), digest)).decode()
        if version == "1":
            validator.validate_message(m)  # fetches the certificate; raises if it fails
        else:
            cert = x509.load_pem_x509_certificate(open(os.path.join(d, "sns-cert.pem"), "rb").read())
            cert.public_key().verify(base64.b64decode(m["Signature"]), plaintext,
                                     padding.PKCS1v15(), hashes.SHA256())
        out.append(m)
    print(json.dumps(out))


def sendgrid_keygen(d):
    key = ec.generate_private_key(ec.SECP256R1())
    with open(os.path.join(d, "sendgrid-key.pem"), "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    der = key.public_key().public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    print(base64.b64encode(der).decode())


def sendgrid_sign(d, timestamp, body):
    from sendgrid.helpers.eventwebhook import EventWebhook

    with open(os.path.join(d, "sendgrid-key.pem"), "rb") as f:
        key = serialization.load_pem_private_key(f.read(), password=None)
    signature = base64.b64encode(
        key.sign((timestamp + body).encode(), ec.ECDSA(hashes.SHA256()))).decode()
    der = key.public_key().public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    assert EventWebhook(base64.b64encode(der).decode()).verify_signature(body, signature, timestamp)
    print(signature)


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "sns-keygen":
        sns_keygen(*args)
    elif cmd == "sns-sign":
        sns_sign(args[0], json.loads(args[1]))
    elif cmd == "sendgrid-keygen":
        sendgrid_keygen(*args)
    elif cmd == "sendgrid-sign":
        sendgrid_sign(*args)
    else:
        sys.exit(f"unknown command {cmd}")
