//! RDMA verbs transport for dsm: not built yet (issue 5). Until it lands the
//! TCP transport is the only one; see `docs/ARCHITECTURE.md`.
