/// Why bytes are being fetched; decides priority, retries and rate limits.
/// Ordered: `OnDemand` > `Prefetch` > `Background`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Intent {
    Background,
    Prefetch,
    OnDemand,
}
