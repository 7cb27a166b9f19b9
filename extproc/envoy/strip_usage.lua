-- Token Meter: take out of an OpenAI-style SSE stream the usage event that the gateway asked the
-- model server for (stream_options.include_usage) on behalf of a client that did not ask for it:
-- the event whose JSON has `"choices": []`. Runs only on the routes the processor picks for such
-- requests (metadata tokenmeter:strip_usage); Envoy's sse_to_metadata has already read the usage.
--
-- Each body chunk is rewritten as it passes (no chunk is held, so an upstream that cuts the
-- connection costs the client nothing it was sent). Bytes of an event are passed on as soon as it
-- is known not to be the usage event, i.e. once its `"choices": [` is followed by anything but
-- `]`, or once the event is complete; until then they are held: a few hundred bytes at most
-- (MAX_HOLD bounds it). Chunks may split anywhere: inside an event, inside a UTF-8 character,
-- inside the blank line that ends an event.

local MAX_HOLD = 65536

-- "drop": the usage event; "pass": any other event; nil: cannot tell yet
local function verdict(s)
  if string.find(s, '"choices"%s*:%s*%[%s*%]') then return "drop" end
  if string.find(s, '"choices"%s*:%s*%[%s*[^%s%]]') then return "pass" end
  return nil
end

-- the position of the last byte of the first blank line ending an event in s, or nil
local function event_end(s)
  local _, a = string.find(s, "\n\n", 1, true)
  local _, b = string.find(s, "\r\n\r\n", 1, true)
  if a and b then return math.min(a, b) end
  return a or b
end

function envoy_on_response(handle)
  local ctype = handle:headers():get("content-type") or ""
  if not string.find(ctype, "text/event-stream", 1, true) then return end
  -- the body changes size: let Envoy frame it (chunked / HTTP/2 DATA)
  handle:headers():remove("content-length")

  local mode = "undecided"  -- of the current event: "undecided", "pass" or "drop"
  local held = ""           -- undecided bytes of the current event
  local tail = ""           -- last bytes seen of the current event once decided (a split blank line)

  for chunk in handle:bodyChunks() do
    local s = chunk:getBytes(0, chunk:length())
    local out = {}
    if s == "" then
      -- the end of the stream: an event cut short of its blank line goes out as it is
      if held ~= "" and verdict(held) ~= "drop" then out[#out + 1] = held end
      held = ""
    end
    while s ~= "" do
      if mode == "undecided" then
        local event = held .. s
        local e = event_end(event)
        if e then
          if verdict(string.sub(event, 1, e)) ~= "drop" then out[#out + 1] = string.sub(event, 1, e) end
          held, s = "", string.sub(event, e + 1)
        else
          local v = verdict(event)
          if v == "drop" then
            mode, held = "drop", ""
          elseif v == "pass" or #event > MAX_HOLD then
            mode, held = "pass", ""
            out[#out + 1] = event
          else
            held = event
          end
          tail = string.sub(event, -3)
          s = ""
        end
      else
        local joined = tail .. s
        local e = event_end(joined)
        if e then
          local upto = e - #tail
          if mode == "pass" then out[#out + 1] = string.sub(s, 1, upto) end
          s, mode, tail = string.sub(s, upto + 1), "undecided", ""
        else
          if mode == "pass" then out[#out + 1] = s end
          tail = string.sub(joined, -3)
          s = ""
        end
      end
    end
    chunk:setBytes(table.concat(out))
  end
end
