// The prompt ollama's server renders from a Modelfile's TEMPLATE for a /api/chat request, for
// tests/test_gguf.py: Go's own text/template executes the template (no ollama binary can be installed
// here), on the data ollama hands it. Before the template runs, ollama (v0.33, as read in its source)
// prepends the Modelfile's SYSTEM when the request has no system message, collates the messages, turns
// them and the tools into the values below, and executes with missingkey=zero; this program does the
// same, written for this test.
//
// stdin: {"template": str, "system": str, "messages": [ollama api.Message], "tools": [ollama api.Tool]}
// stdout: the rendered prompt.
package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
)

type request struct {
	Template string    `json:"template"`
	System   string    `json:"system"`
	Messages []message `json:"messages"`
	Tools    []tool    `json:"tools"`
}

// api.Message, as template.go's templateMessage hands it to the template.
type message struct {
	Role      string     `json:"role"`
	Content   string     `json:"content"`
	Thinking  string     `json:"thinking"`
	ToolCalls []toolCall `json:"tool_calls"`
	ToolName  string     `json:"tool_name"`
}

type toolCall struct {
	ID       string `json:"id"`
	Function struct {
		Index     int       `json:"index"`
		Name      string    `json:"name"`
		Arguments arguments `json:"arguments"`
	} `json:"function"`
}

// templateArgs: `{{ .Function.Arguments }}` prints the arguments as compact JSON.
type arguments map[string]any

func (a arguments) String() string {
	if a == nil {
		return "{}"
	}
	text, _ := json.Marshal(a)
	return string(text)
}

// templateTool: `{{ . }}` on a tool prints it as compact JSON, in this field order.
type tool struct {
	Type     string `json:"type"`
	Items    any    `json:"items,omitempty"`
	Function struct {
		Name        string `json:"name"`
		Description string `json:"description"`
		Parameters  struct {
			Type       string         `json:"type"`
			Defs       any            `json:"$defs,omitempty"`
			Items      any            `json:"items,omitempty"`
			Required   []string       `json:"required,omitempty"`
			Properties map[string]any `json:"properties"`
		} `json:"parameters"`
	} `json:"function"`
}

func (t tool) String() string {
	text, _ := json.Marshal(t)
	return string(text)
}

type tools []tool

func (t tools) String() string {
	text, _ := json.Marshal(t)
	return string(text)
}

// collate: all system messages joined for .System, and consecutive messages of one role (tool
// messages excepted) merged into one.
func collate(messages []message) (string, []*message) {
	var system []string
	var collated []*message
	for i := range messages {
		messages[i].Role = strings.ToLower(messages[i].Role)
		if messages[i].Role == "system" {
			system = append(system, messages[i].Content)
		}
		if len(collated) > 0 && collated[len(collated)-1].Role == messages[i].Role && messages[i].Role != "tool" {
			collated[len(collated)-1].Content += "\n\n" + messages[i].Content
		} else {
			collated = append(collated, &messages[i])
		}
	}
	return strings.Join(system, "\n\n"), collated
}

func main() {
	var req request
	if err := json.NewDecoder(os.Stdin).Decode(&req); err != nil {
		panic(err)
	}
	messages := req.Messages
	if len(messages) > 0 && messages[0].Role != "system" && req.System != "" {
		messages = append([]message{{Role: "system", Content: req.System}}, messages...)
	}
	system, collated := collate(messages)
	funcs := template.FuncMap{"json": func(v any) string {
		text, _ := json.Marshal(v)
		return string(text)
	}}
	tmpl := template.Must(template.New("").Option("missingkey=zero").Funcs(funcs).Parse(req.Template))
	var toolValues tools
	if req.Tools != nil {
		toolValues = req.Tools
	}
	values := map[string]any{"System": system, "Messages": collated, "Tools": toolValues, "Response": "",
		"Think": false, "ThinkLevel": "", "IsThinkSet": false}
	if err := tmpl.Execute(os.Stdout, values); err != nil {
		panic(err)
	}
}
