package metering

import (
	"sync"

	"github.com/tiktoken-go/tokenizer"
)

// Family is how a model's text is cut into tokens, for counting what a backend did not
// report (a stream cut short, an answer without usage).
type Family int

const (
	// FamilyEstimate counts one token per four bytes of text (and at least one per message
	// that carried text): a stated estimate for models whose tokenizer the gateway does not
	// have (Ollama's GGUF vocabularies, Anthropic's).
	FamilyEstimate Family = iota
	// FamilyOpenAI counts with OpenAI's o200k_base vocabulary (the GPT-4o, GPT-4.1, o-series
	// and GPT-5 tokenizer), through tiktoken-go.
	FamilyOpenAI
)

// maxTokenizedText bounds the text given to the real tokenizer; beyond it the estimate of
// FamilyEstimate counts the rest (a stated rule, to keep a fault path's cost bounded).
const maxTokenizedText = 1 << 20

var (
	o200kOnce sync.Once
	o200k     tokenizer.Codec
)

// CountTokens counts the tokens of text for the family; messages is how many stream messages
// carried that text (a floor for the estimate: a backend sends at least one token a message).
func CountTokens(f Family, text []byte, messages int64) int64 {
	if len(text) == 0 {
		return messages
	}
	if f == FamilyOpenAI {
		o200kOnce.Do(func() {
			c, err := tokenizer.Get(tokenizer.O200kBase)
			if err == nil {
				o200k = c
			}
		})
		if o200k != nil {
			head := text[:min(len(text), maxTokenizedText)]
			if n, err := o200k.Count(string(head)); err == nil {
				return int64(n) + EstimateTokens(int64(len(text)-len(head)), 0)
			}
		}
	}
	return EstimateTokens(int64(len(text)), messages)
}

// EstimateTokens is FamilyEstimate's count: one token per four bytes, rounded up, and at least
// one per message.
func EstimateTokens(bytes, messages int64) int64 { return max(messages, (bytes+3)/4) }
