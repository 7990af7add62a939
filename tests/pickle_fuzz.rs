//! Property tests (proptest) of the pickle reader: random bytes, opcode soup and mutations
//! (byte flips, truncations, splices) of real pickles never panic; an error is fine, and
//! whatever loads can be compiled and scored. More cases: PROPTEST_CASES=100000.

use fad::forest::Forest;
use fad::sklearn::import_bytes;
use proptest::prelude::*;
use std::path::Path;
use std::sync::OnceLock;

fn seeds() -> &'static [Vec<u8>] {
    static S: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    S.get_or_init(|| {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pickles");
        ["small-p2.pkl", "small-p4.pkl", "small-p5.pkl", "small-joblib.pkl", "subfeat.pkl", "one-row.pkl"]
            .iter()
            .map(|n| std::fs::read(dir.join(n)).unwrap())
            .collect()
    })
}

/// Loads `bytes`; when that works, compiles and scores a row as `fad score` would.
fn exercise(bytes: &[u8]) {
    if let Ok(imported) = import_bytes(bytes)
        && let Ok(forest) = Forest::new(&imported.spec)
    {
        let row = vec![100f32; forest.n_features()];
        let s = forest.score_samples_row(&row);
        assert!(s.is_nan() || (-1.0..=0.0).contains(&s), "score {s}");
    }
}

/// Opcode bytes of protocols 2-5 and small arguments, so that random input gets far.
fn opcode_soup() -> impl Strategy<Value = Vec<u8>> {
    let ops = b"(.012NJKMRXabcde}hjl]qrstu)GBC\x80\x81\x85\x86\x87\x88\x89\x8a\x8b\x8c\x8d\x8e\x8f\x90\x91\x92\x93\x94\x95\x96";
    let byte = prop_oneof![
        3 => proptest::sample::select(ops.to_vec()),
        2 => 0u8..8,
        1 => any::<u8>(),
    ];
    proptest::collection::vec(byte, 0..400).prop_map(|mut v| {
        v.splice(0..0, *b"\x80\x04");
        v
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2000)) {
        exercise(&bytes);
    }

    #[test]
    fn opcode_soup_never_panics(bytes in opcode_soup()) {
        exercise(&bytes);
    }

    #[test]
    fn flipped_bytes_of_real_pickles_never_panic(
        seed in 0usize..6,
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..12),
        cut in proptest::option::of(any::<prop::sample::Index>()),
    ) {
        let mut bytes = seeds()[seed].clone();
        for (at, b) in flips {
            let i = at.index(bytes.len());
            bytes[i] = b;
        }
        if let Some(cut) = cut {
            bytes.truncate(cut.index(bytes.len()));
        }
        exercise(&bytes);
    }

    #[test]
    fn spliced_real_pickles_never_panic(
        a in 0usize..6,
        b in 0usize..6,
        from in any::<prop::sample::Index>(),
        to in any::<prop::sample::Index>(),
        len in 0usize..3000,
    ) {
        // a's head, then a run of b's bytes from somewhere else, then a's tail
        let (sa, sb) = (&seeds()[a], &seeds()[b]);
        let i = from.index(sa.len());
        let j = to.index(sb.len());
        let mut bytes = sa[..i].to_vec();
        bytes.extend_from_slice(&sb[j..(j + len).min(sb.len())]);
        bytes.extend_from_slice(&sa[i..]);
        exercise(&bytes);
    }
}
