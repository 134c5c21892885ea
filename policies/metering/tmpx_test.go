package metering

import (
	"bytes"
	"testing"
)

var tmpData = []byte(`{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"content":" fox"},"finish_reason":null}],"usage":null}`)

func BenchmarkTmpWalk(b *testing.B) {
	for b.Loop() {
		var c chunk
		c.read(tmpData)
	}
}

func BenchmarkTmpIndex(b *testing.B) {
	for b.Loop() {
		i := bytes.Index(tmpData, []byte(`"content"`))
		j := skipSpace(tmpData, i+9)
		j = skipSpace(tmpData, j+1)
		e := skipString(tmpData, j)
		_ = textLen(tmpData[j:e])
		_ = bytes.Index(tmpData, []byte(`"usage"`))
	}
}

func BenchmarkTmpLineEnd(b *testing.B) {
	ev := []byte("data: " + string(tmpData) + "\n\n")
	for b.Loop() {
		_ = lineEnd(ev)
	}
}
