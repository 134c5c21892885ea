package metering_test

import (
	"fmt"
	"os"
	"strings"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/metering"
)

func ExampleStreamMeter() {
	upstream := []string{
		`data: {"choices":[{"index":0,"delta":{"content":"Hello"},"finish_reason":null}],"usage":null}` + "\n\n",
		`data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}],"usage":null}` + "\n\ndata: {\"choices\":[],",
		`"usage":{"prompt_tokens":9,"completion_tokens":12}}` + "\n\ndata: [DONE]\n\n",
	}
	m := &metering.StreamMeter{
		Format: metering.SSE,
		OnUsage: func(u metering.Usage) []byte {
			return []byte(`"credits_charged":0.000021`)
		},
	}
	for _, read := range upstream {
		if err := m.Write(os.Stdout, []byte(read)); err != nil {
			// The client is gone: meter the rest of the stream into io.Discard.
			return
		}
	}
	_ = m.Flush(os.Stdout)
	u, ok := m.Usage()
	fmt.Println(strings.Repeat("-", 8))
	fmt.Println(u.InputTokens, u.OutputTokens, ok, m.Produced(), m.Done())
	// Output:
	// data: {"choices":[{"index":0,"delta":{"content":"Hello"},"finish_reason":null}],"usage":null}
	//
	// data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}],"usage":null}
	//
	// data: {"choices":[],"usage":{"prompt_tokens":9,"completion_tokens":12},"credits_charged":0.000021}
	//
	// data: [DONE]
	//
	// --------
	// 9 12 true {1 5} true
}
