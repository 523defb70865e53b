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
    let stream = block_on(list.read_range_stream(7..9, Intent::Background)).unwrap();
    let pieces: Vec<_> = block_on(stream.collect::<Vec<_>>());
    assert_eq!(&pieces[0].as_ref().unwrap()[..], b"rr");
    assert_eq!(
        *log.lock().unwrap(),
        [
            "read peer 5..7",
            "read mirror 5..7",
            "read registry 5..7",
            "stream peer 7..9",
            "stream mirror 7..9",
            "stream registry 7..9",
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
    assert_eq!(log.lock().unwrap().len(), 4);
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
            Box::pin(async move { Ok(Bytes::from(vec![7u8; (range.end - range.start) as usize])) })
        }
    }
    let list = Sources::new(Arc::new(Plain));
    let stream = block_on(list.read_range_stream(1..4, Intent::OnDemand)).unwrap();
    let pieces: Vec<_> = block_on(stream.collect::<Vec<_>>());
    assert_eq!(pieces.len(), 1);
    assert_eq!(&pieces[0].as_ref().unwrap()[..], &[7, 7, 7]);
}
