//! Image references, manifests, auth and ranged GETs.
