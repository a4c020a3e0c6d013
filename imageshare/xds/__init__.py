"""XDS.b / XDS-I.b wire formats: safe XML parsing, SOAP 1.2 + WS-Addressing, MTOM/XOP.

Everything in this package is pure (bytes and lxml elements in, values out): no Twisted,
no network. The Twisted resources and the HTTP client that use it live elsewhere.
"""
