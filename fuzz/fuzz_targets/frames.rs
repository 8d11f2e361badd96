//! Any byte stream, cut into reads anywhere: the splitter returns frames
//! whose lengths add up to what it consumed, or an error; never a panic.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;

use agentgate::wire::FrameSplitter;

fuzz_target!(|data: &[u8]| {
    let (cut, stream) = match data.split_first() {
        Some((c, s)) => (usize::from(*c).max(1), s),
        None => return,
    };
    let splitter = FrameSplitter::new(1 << 16);
    let mut buf = BytesMut::new();
    let mut consumed = 0usize;
    for chunk in stream.chunks(cut) {
        buf.extend_from_slice(chunk);
        loop {
            match splitter.split(&mut buf) {
                Ok(Some(f)) => {
                    let declared = u32::from_be_bytes([
                        f.as_bytes()[1],
                        f.as_bytes()[2],
                        f.as_bytes()[3],
                        f.as_bytes()[4],
                    ]) as usize;
                    assert_eq!(declared + 1, f.as_bytes().len());
                    consumed += f.as_bytes().len();
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
    assert_eq!(consumed + buf.len(), stream.len());
});
