//! eStargz: footer, TOC, index building, chunk decoding and the writer.
