//! Misalignment tests live here, not in tests/local.rs: `validate` debug-asserts on
//! misaligned I/O (a core bug) except under cfg(test), which only unit tests get.

use std::path::PathBuf;

use raidcore::{Class, IoBuf, IoError, Member, MemberIo, Op, Proto, Tag};

use super::{Engine, LocalMember};

fn image(dir: &tempfile::TempDir, size: u64) -> PathBuf {
    let path = dir.path().join("a.img");
    let f = std::fs::File::create(&path).expect("create image");
    f.set_len(size).expect("size image");
    path
}

fn tag(op: Op, offset: u64, len: u64) -> Tag {
    Tag {
        id: raidcore::io::next_tag_id(),
        class: Class::Local,
        member: 0,
        proto: Proto::File,
        op,
        offset,
        len,
        fua: false,
    }
}

fn engines() -> [Engine; 2] {
    [Engine::IoUring, Engine::Pread]
}

#[tokio::test]
async fn misaligned_requests_are_refused_without_touching_the_disk() {
    // /tmp, not /dev/shm: tmpfs accepts misaligned O_DIRECT and would hide bugs.
    let dir = tempfile::tempdir_in("/tmp").expect("tempdir");
    let path = image(&dir, 1 << 20);
    let mut map = memmap2::MmapMut::map_anon(16384).expect("aligned buffer");
    for engine in engines() {
        let member = match LocalMember::open_with(&path, engine) {
            Ok(m) => m,
            Err(e) => {
                eprintln!("skipping {engine:?}: {e}");
                continue;
            }
        };
        let bs = u64::from(member.info().block_size);
        let base = map.as_mut_ptr();
        // SAFETY: every view lies inside the 16 KiB mapping, which outlives the I/O.
        let (aligned, skewed) = unsafe {
            (
                IoBuf::from_raw(base, 8192),
                IoBuf::from_raw(base.add(1), 8192),
            )
        };
        let cases = [
            (tag(Op::Read, 100, bs), aligned),
            (tag(Op::Write, bs / 2, bs), aligned),
            (tag(Op::Read, 0, 100), aligned),
            (tag(Op::Write, 0, bs + 1), aligned),
            (tag(Op::Read, 0, bs), skewed),
            (tag(Op::Write, bs, bs), skewed),
            (tag(Op::Trim, 3, bs), IoBuf::empty()),
            (tag(Op::WriteZeroes, 0, 7), IoBuf::empty()),
            // Buffer shorter than the request.
            (tag(Op::Read, 0, 2 * bs), unsafe {
                IoBuf::from_raw(base, bs as usize)
            }),
        ];
        for (t, buf) in cases {
            let r = member.submit(MemberIo { tag: t, buf }).await;
            match r {
                Err(e @ IoError::Invalid(_)) => assert_eq!(e.errno(), libc::EINVAL),
                other => panic!("{engine:?} {t:?}: expected Invalid, got {other:?}"),
            }
        }
        let on_disk = std::fs::read(&path).expect("read image");
        assert!(
            on_disk.iter().all(|&b| b == 0),
            "a refused write reached the file"
        );
    }
}
