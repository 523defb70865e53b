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

impl Intent {
    /// Every intent, in the order of their discriminants (lowest first).
    pub const ALL: [Intent; 4] = [
        Intent::Background,
        Intent::Prefetch,
        Intent::OnDemand,
        Intent::Open,
    ];

    /// The name logs and metrics show.
    pub fn as_str(self) -> &'static str {
        match self {
            Intent::Background => "background",
            Intent::Prefetch => "prefetch",
            Intent::OnDemand => "on-demand",
            Intent::Open => "open",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_is_in_discriminant_order() {
        for (i, intent) in Intent::ALL.iter().enumerate() {
            assert_eq!(*intent as usize, i, "{intent:?}");
        }
    }
}
