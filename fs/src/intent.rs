/// Why bytes are being fetched; decides priority, retries and rate limits.
/// Ordered: `Open` > `OnDemand` > `Prefetch` > `Background`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Intent {
    Background,
    Prefetch,
    OnDemand,
    /// Opening a layer: its format's index (eStargz: footer and TOC), on
    /// the path of a Prepare; admitted at once and retried like `OnDemand`.
    Open,
}
