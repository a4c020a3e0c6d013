"""The IHE ATNA audit trail: messages (PS3.15 A.5), local log, spool, syslog sender."""

from imageshare.audit.service import Audit, build_audit
from imageshare.audit.trail import NO_AUDIT, AuditTrail

__all__ = ["Audit", "AuditTrail", "NO_AUDIT", "build_audit"]
