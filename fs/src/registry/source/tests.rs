use std::sync::Mutex;

use super::*;

/// A member that logs each read under its name and fails or answers with
/// its name repeated.
struct Fake {
    name: &'static str,
    fails: bool,
    log: Arc<Mutex<Vec<String>>>,
}

impl Fake {
    fn member(
        name: &'static str,
        fails: bool,
        log: &Arc<Mutex<Vec<String>>>,
    ) -> Arc<dyn BlobSource> {
        Arc::new(Fake {
            name,
            fails,
            log: log.clone(),
        })
    }

    fn answer(&self, how: &str, range: Range<u64>) -> Result<Bytes, RegistryError> {
        self.log.lock().unwrap().push(format!(
            "{how} {} {}..{}",
            self.name, range.start, range.end
        ));
        if self.fails {
            return Err(RegistryError::Unreachable {
                host: self.name.to_string(),
                reason: "down".to_string(),
            });
        }
        let len = usize::try_from(range.end - range.start).unwrap();
        Ok(Bytes::from(self.name.as_bytes()[..1].repeat(len)))
    }
}

impl BlobSource for Fake {
    fn size(&self) -> u64 {
        100
    }

    fn read_range(
        &self,
        range: Range<u64>,
        _intent: Intent,
    ) -> BoxFuture<'_, Result<Bytes, RegistryError>> {
        Box::pin(async move { self.answer("read", range) })
    }

    fn read_range_stream(
        &self,
        range: Range<u64>,
        _intent: Intent,
    ) -> BoxFuture<'_, Result<ByteStream, RegistryError>> {
        Box::pin(async move { self.answer("stream", range).map(one_piece) })
    }
}

fn block_on<F: Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(f)
}

#[test]
fn the_first_source_that_answers_is_the_only_one_asked() {
    let log = Arc::new(Mutex::new(Vec::new()));
    let list = Sources::new(Fake::member("mirror", false, &log))
        .then(Fake::member("registry", false, &log));
    assert_eq!(list.size(), 100);
    let got = block_on(list.read_range(0..3, Intent::OnDemand)).unwrap();
    assert_eq!(&got[..], b"mmm");
    assert_eq!(*log.lock().unwrap(), ["read mirror 0..3"]);
}

#[test]
fn a_failing_source_falls_back_to_the_next_in_order() {
    let log = Arc::new(Mutex::new(Vec::new()));
    let list = Sources::new(Fake::member("peer", true, &log))
        .then(Fake::member("mirror", true, &log))
        .then(Fake::member("registry", false, &log));
    let got = block_on(list.read_range(5..7, Intent::Prefetch)).unwrap();
    assert_eq!(&got[..], b"rr");
    // The failed members are skipped for a while: the next read goes
    // straight to the registry.
    let stream = block_on(list.read_range_stream(7..9, Intent::Background)).unwrap();
    let pieces: Vec<_> = block_on(stream.collect::<Vec<_>>());
    assert_eq!(&pieces[0].as_ref().unwrap()[..], b"rr");
    assert_eq!(
        *log.lock().unwrap(),
        [
            "read peer 5..7",
            "read mirror 5..7",
            "read registry 5..7",
            "stream registry 7..9",
        ]
    );
}

#[test]
fn a_member_whose_bytes_fail_verification_is_skipped() {
    let log = Arc::new(Mutex::new(Vec::new()));
    let list = Sources::new(Fake::member("mirror", false, &log))
        .then(Fake::member("registry", false, &log));
    assert_eq!(
        &block_on(list.read_range(0..2, Intent::OnDemand)).unwrap()[..],
        b"mm"
    );
    assert_eq!(
        &block_on(list.read_range(10..20, Intent::OnDemand)).unwrap()[..],
        b"mmmmmmmmmm"
    );
    // Bytes 12..14 failed: the read that served them was the mirror's.
    assert!(list.distrust(12..14));
    assert_eq!(
        &block_on(list.read_range(12..14, Intent::OnDemand)).unwrap()[..],
        b"rr"
    );
    let stream = block_on(list.read_range_stream(0..1, Intent::OnDemand)).unwrap();
    assert_eq!(
        &block_on(stream.collect::<Vec<_>>())[0].as_ref().unwrap()[..],
        b"r"
    );
    // The registry's own bytes failing: there is nowhere else to go.
    assert!(!list.distrust(12..14));
    // Nothing read there: nobody to blame.
    assert!(!list.distrust(50..60));
    assert_eq!(
        *log.lock().unwrap(),
        [
            "read mirror 0..2",
            "read mirror 10..20",
            "read registry 12..14",
            "stream registry 0..1",
        ]
    );
}

#[test]
fn when_every_source_fails_the_last_error_is_returned() {
    let log = Arc::new(Mutex::new(Vec::new()));
    let list =
        Sources::new(Fake::member("mirror", true, &log)).then(Fake::member("registry", true, &log));
    let err = block_on(list.read_range(0..1, Intent::OnDemand)).unwrap_err();
    assert!(err.to_string().contains("registry"), "{err}");
    assert!(block_on(list.read_range_stream(0..1, Intent::OnDemand)).is_err());
    // The mirror failed first: skipped for the second read, the registry is not.
    assert_eq!(log.lock().unwrap().len(), 3);
}

#[test]
fn a_source_with_one_member_reads_through_the_default_stream() {
    /// Implements only the required read.
    struct Plain;
    impl BlobSource for Plain {
        fn size(&self) -> u64 {
            4
        }
        fn read_range(
            &self,
            range: Range<u64>,
            _intent: Intent,
        ) -> BoxFuture<'_, Result<Bytes, RegistryError>> {
            let len = crate::num::usize_from(range.end - range.start);
            Box::pin(async move { Ok(Bytes::from(vec![7u8; len])) })
        }
    }
    let list = Sources::new(Arc::new(Plain));
    let stream = block_on(list.read_range_stream(1..4, Intent::OnDemand)).unwrap();
    let pieces: Vec<_> = block_on(stream.collect::<Vec<_>>());
    assert_eq!(pieces.len(), 1);
    assert_eq!(&pieces[0].as_ref().unwrap()[..], &[7, 7, 7]);
}
