"""The egress server: authenticates sessions, decides policy, dials safely, audits tunnels."""
