// The official ollama JavaScript client against a queen: list, then a streamed chat.
// Prints one JSON object: the model names and each streamed piece with its arrival time (ms).
import { Ollama } from 'ollama'

const client = new Ollama({ host: process.env.OLLAMA_HOST, headers: { Authorization: `Bearer ${process.env.OLLAMA_KEY}` } })
const listed = await client.list()
const stream = await client.chat({
  model: 'gemma3-270m',
  messages: [{ role: 'user', content: 'Name three colours.' }],
  stream: true,
  options: { num_predict: 16, temperature: 0 },
})
const pieces = []
let final = null
for await (const part of stream) {
  if (part.done) final = part
  else pieces.push({ text: part.message.content, at: performance.now() })
}
console.log(JSON.stringify({ models: listed.models.map((m) => m.name), pieces, final }))
