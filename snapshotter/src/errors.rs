//! How an error is reported in one line: `outer: cause: root cause`, the
//! message a client (ctr) shows and the reason a log line gives.

/// The error and each of its sources, joined with `: `.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    msg
}
