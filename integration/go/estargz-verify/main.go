// estargz-verify checks eStargz blobs with the reference reader: the Go
// estargz package of stargz-snapshotter (Debian's
// golang-github-containerd-stargz-snapshotter-dev), so that what tarn
// writes is judged by the code other readers run, not by tarn's own.
//
//	estargz-verify -toc-digest sha256:... [-diff-id sha256:...] [-uncompressed-size N] BLOB
//
// For the blob it checks:
//   - estargz.Open parses the footer and the TOC, and VerifyTOC accepts the
//     annotation's TOC digest (which also needs a digest for every chunk);
//   - every regular file read through the reader, chunk by chunk, matches
//     its chunk digests, and the whole file its file digest;
//   - the blob read as one gzip stream is one tar whose entries are exactly
//     the TOC's (names, types, sizes, modes, owners, link targets, contents'
//     digests), in the same order, plus the TOC's own entry last; and its
//     sha256 and length are the diff ID and uncompressed size given.
//
// It prints one line per failure and exits 1 if there was any, 2 on bad
// usage.
package main

import (
	"archive/tar"
	"compress/gzip"
	"crypto/sha256"
	"flag"
	"fmt"
	"hash"
	"io"
	"os"
	"path"
	"strings"

	"github.com/containerd/stargz-snapshotter/estargz"
	digest "github.com/opencontainers/go-digest"
)

// tocName is the tar member that holds the TOC JSON.
const tocName = "stargz.index.json"

type checker struct {
	blob     string
	failures int
}

func (c *checker) fail(format string, args ...interface{}) {
	c.failures++
	fmt.Printf("%s: %s\n", c.blob, fmt.Sprintf(format, args...))
}

func main() {
	tocDigest := flag.String("toc-digest", "", "the layer's containerd.io/snapshot/stargz/toc.digest annotation (required)")
	diffID := flag.String("diff-id", "", "the layer's diff ID in the image config (checked if given)")
	size := flag.Int64("uncompressed-size", -1, "the layer's io.containers.estargz.uncompressed-size annotation (checked if given)")
	flag.Parse()
	if flag.NArg() != 1 || *tocDigest == "" {
		fmt.Fprintln(os.Stderr, "usage: estargz-verify -toc-digest sha256:... [-diff-id sha256:...] [-uncompressed-size N] BLOB")
		os.Exit(2)
	}
	c := &checker{blob: flag.Arg(0)}
	c.check(*tocDigest, *diffID, *size)
	if c.failures > 0 {
		os.Exit(1)
	}
	fmt.Printf("%s: ok\n", c.blob)
}

func (c *checker) check(tocDigest, diffID string, size int64) {
	want, err := digest.Parse(tocDigest)
	if err != nil {
		c.fail("bad -toc-digest %q: %v", tocDigest, err)
		return
	}
	f, err := os.Open(c.blob)
	if err != nil {
		c.fail("%v", err)
		return
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		c.fail("%v", err)
		return
	}
	sr := io.NewSectionReader(f, 0, st.Size())
	r, err := estargz.Open(sr)
	if err != nil {
		c.fail("estargz.Open: %v", err)
		return
	}
	v, err := r.VerifyTOC(want)
	if err != nil {
		c.fail("VerifyTOC: %v", err)
		return
	}
	toc, err := readTOC(sr)
	if err != nil {
		c.fail("reading the TOC: %v", err)
		return
	}
	c.checkFiles(r, v, toc)
	c.checkStream(sr, toc, diffID, size)
}

// readTOC returns the TOC's entries in blob order, as the JSON lists them
// (estargz.Reader keeps them unexported).
func readTOC(sr *io.SectionReader) (*estargz.JTOC, error) {
	off, footer, err := estargz.OpenFooter(sr)
	if err != nil {
		return nil, err
	}
	toc := io.NewSectionReader(sr, off, sr.Size()-off-footer)
	j, _, err := new(estargz.GzipDecompressor).ParseTOC(toc)
	return j, err
}

// checkFiles reads every regular file through the reader, each chunk
// through its verifier, and the whole file against its digest.
func (c *checker) checkFiles(r *estargz.Reader, v estargz.TOCEntryVerifier, toc *estargz.JTOC) {
	for _, e := range toc.Entries {
		if e.Type != "reg" || e.Size == 0 {
			continue
		}
		name := cleanName(e.Name)
		fr, err := r.OpenFile(name)
		if err != nil {
			c.fail("%s: OpenFile: %v", name, err)
			continue
		}
		whole := sha256.New()
		for off := int64(0); off < e.Size; {
			ce, ok := r.ChunkEntryForOffset(name, off)
			if !ok {
				c.fail("%s: no chunk at offset %d", name, off)
				break
			}
			cv, err := v.Verifier(ce)
			if err != nil {
				c.fail("%s: chunk at %d: %v", name, off, err)
				break
			}
			n, err := io.Copy(io.MultiWriter(cv, whole), io.NewSectionReader(fr, ce.ChunkOffset, ce.ChunkSize))
			if err != nil || n != ce.ChunkSize {
				c.fail("%s: chunk at %d: read %d of %d bytes: %v", name, off, n, ce.ChunkSize, err)
				break
			}
			if !cv.Verified() {
				c.fail("%s: chunk at %d (%d bytes) does not match its chunk digest", name, off, ce.ChunkSize)
			}
			off = ce.ChunkOffset + ce.ChunkSize
		}
		if got := digest.NewDigest(digest.SHA256, whole); e.Digest != "" && got.String() != e.Digest {
			c.fail("%s: content %s, TOC digest %s", name, got, e.Digest)
		}
	}
}

// checkStream reads the blob as one gzip stream of one tar and compares
// its entries with the TOC's.
func (c *checker) checkStream(sr *io.SectionReader, toc *estargz.JTOC, diffID string, size int64) {
	var entries []*estargz.TOCEntry
	for _, e := range toc.Entries {
		if e.Type != "chunk" {
			entries = append(entries, e)
		}
	}
	diff := &counter{h: sha256.New()}
	gz, err := gzip.NewReader(io.NewSectionReader(sr, 0, sr.Size()))
	if err != nil {
		c.fail("not a gzip stream: %v", err)
		return
	}
	tr := tar.NewReader(io.TeeReader(gz, diff))
	i := 0
	sawTOC := false
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			c.fail("tar stream after %d entries: %v", i, err)
			return
		}
		name := cleanName(h.Name)
		content := sha256.New()
		if _, err := io.Copy(content, tr); err != nil {
			c.fail("tar stream: %s: %v", name, err)
			return
		}
		if name == tocName {
			sawTOC = true
			continue
		}
		if sawTOC {
			c.fail("tar stream: %s after the TOC", name)
		}
		if i >= len(entries) {
			c.fail("tar stream: %s is not in the TOC", name)
			continue
		}
		c.compare(h, entries[i], digest.NewDigest(digest.SHA256, content))
		i++
	}
	// The rest of the stream (end blocks, then the footer's empty member)
	// is part of what the diff ID hashes.
	if _, err := io.Copy(diff, gz); err != nil {
		c.fail("gzip stream after the tar: %v", err)
	}
	for ; i < len(entries); i++ {
		c.fail("TOC entry %s is not in the tar stream", cleanName(entries[i].Name))
	}
	if !sawTOC {
		c.fail("tar stream: no %s", tocName)
	}
	if got := digest.NewDigest(digest.SHA256, diff.h); diffID != "" && got.String() != diffID {
		c.fail("uncompressed stream %s, diff ID %s", got, diffID)
	}
	if size >= 0 && diff.n != size {
		c.fail("uncompressed stream of %d bytes, annotation %d", diff.n, size)
	}
}

// counter hashes and counts what is written to it.
type counter struct {
	h hash.Hash
	n int64
}

func (c *counter) Write(p []byte) (int, error) {
	c.n += int64(len(p))
	return c.h.Write(p)
}

var types = map[byte]string{
	tar.TypeReg: "reg", tar.TypeRegA: "reg", tar.TypeLink: "hardlink",
	tar.TypeSymlink: "symlink", tar.TypeChar: "char", tar.TypeBlock: "block",
	tar.TypeDir: "dir", tar.TypeFifo: "fifo",
}

// compare reports where a tar header and its TOC entry disagree.
func (c *checker) compare(h *tar.Header, e *estargz.TOCEntry, content digest.Digest) {
	name := cleanName(h.Name)
	if cleanName(e.Name) != name {
		c.fail("tar stream: %s where the TOC has %s", name, cleanName(e.Name))
		return
	}
	diffs := []string{}
	check := func(what string, tarV, tocV interface{}) {
		if fmt.Sprint(tarV) != fmt.Sprint(tocV) {
			diffs = append(diffs, fmt.Sprintf("%s %v (TOC %v)", what, tarV, tocV))
		}
	}
	check("type", types[h.Typeflag], e.Type)
	check("mode", h.Mode&0o7777, e.Mode&0o7777)
	check("uid", h.Uid, e.UID)
	check("gid", h.Gid, e.GID)
	if h.Typeflag == tar.TypeSymlink || h.Typeflag == tar.TypeLink {
		check("link", h.Linkname, e.LinkName)
	}
	if e.Type == "reg" {
		check("size", h.Size, e.Size)
		if e.Size > 0 {
			check("digest", content, e.Digest)
		}
	}
	if len(diffs) > 0 {
		c.fail("%s: %s", name, strings.Join(diffs, ", "))
	}
}

// cleanName is the reference reader's name rule: relative to the root.
func cleanName(name string) string {
	return strings.TrimPrefix(path.Clean("/"+name), "/")
}
