"""The caddy role's check of the certificate a site is served with (after an acme run): what
`openssl x509 -noout -issuer -ext subjectAltName` prints for it, judged against the name and the issuers
expected. Standard library only."""

from __future__ import annotations

import re

# Caddy's own CA ("tls internal", and its fallback while no public certificate is there).
INTERNAL_ISSUER = "Caddy Local Authority"


def _issuer(openssl_text: str) -> str:
    match = re.search(r"^issuer=(.*)$", openssl_text or "", re.MULTILINE)
    return match.group(1).strip() if match else ""


def _dns_names(openssl_text: str) -> list[str]:
    return [name.lower() for name in re.findall(r"DNS:([^,\s]+)", openssl_text or "")]


def _covers(pattern: str, name: str) -> bool:
    if pattern.startswith("*."):
        return "." in name and name.split(".", 1)[1] == pattern[2:]
    return pattern == name


def caddy_certificate_problem(openssl_text, site_address, expected_issuers) -> str:
    """Why the certificate described by OPENSSL_TEXT is not the public one SITE_ADDRESS should be served
    with ('' when it is): no certificate, Caddy's internal CA, another issuer than EXPECTED_ISSUERS (substrings
    of the issuer, e.g. "Let's Encrypt"), or a certificate for other names."""
    issuer = _issuer(openssl_text)
    if not issuer:
        return "no certificate is served for it"
    if INTERNAL_ISSUER in issuer:
        return f"it is served with Caddy's internal certificate ({issuer}): no public certificate was issued yet"
    if not any(expected in issuer for expected in expected_issuers or []):
        return f"its certificate comes from {issuer}, not from {' or '.join(expected_issuers)}"
    name = str(site_address).strip().lower()
    if not any(_covers(pattern, name) for pattern in _dns_names(openssl_text)):
        return f"its certificate ({issuer}) is for {', '.join(_dns_names(openssl_text)) or 'no DNS name'}"
    return ""


class FilterModule:
    def filters(self):
        return {"caddy_certificate_problem": caddy_certificate_problem}
