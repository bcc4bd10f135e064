# frozen_string_literal: true

# What fuzz/pipeline_target.c checks on every input (loaded once by the target): the
# pipeline file loader either returns a Definition that holds together or raises
# Flowctl::Pipeline::DefinitionError whose every problem names the file and a line of
# it. Anything else raised here (FuzzPipeline::Bug or another exception) is a crash.
require "flowctl/pipeline"

module FuzzPipeline
  class Bug < StandardError; end

  FILE = "fuzz.yaml"

  module_function

  # Runs the loader once on each kind of input so that what Ruby allocates lazily on
  # first use (and keeps) is allocated before LeakSanitizer watches.
  def warm_up
    Dir[File.join(__dir__, "corpus", "pipeline", "*")].each { |f| check(File.binread(f)) }
    ["", "\x01a: [", "\x00\xff\xfe", "\x00a: &x [*x]", "\x00a: !!int x", "\x01- 1"].each { |s| check(s.b) }
  end

  def check(bytes)
    check_commands = bytes.getbyte(0).to_i.odd?
    text = (bytes.byteslice(1..) || "").dup.force_encoding(Encoding::UTF_8)
    definition = Flowctl::Pipeline::Definition.parse(text, file: FILE, check_commands: check_commands, env: { "PATH" => "/usr/bin:/bin" })
    check_definition(definition)
    :ok
  rescue Flowctl::Pipeline::DefinitionError => e
    check_error(e, text)
    :error
  end

  def check_error(err, text)
    # YAML breaks lines at LF, CR, CRLF and (1.1) NEL, LS, PS
    lines = text.b.scan(/\r\n|\r|\n|\xC2\x85|\xE2\x80[\xA8\xA9]/n).size + 2
    raise Bug, "a DefinitionError without problems" if err.problems.empty?

    err.problems.each do |pr|
      raise Bug, "problem without the file: #{pr.inspect}" unless pr.file == FILE
      raise Bug, "problem without a line: #{pr.inspect}" unless pr.line.is_a?(Integer) && pr.line.between?(1, lines)
      raise Bug, "problem without a message: #{pr.inspect}" unless pr.message.is_a?(String) && !pr.message.empty?
      raise Bug, "message does not start with file:line: #{pr}" unless pr.to_s.start_with?("#{FILE}:#{pr.line}: ")
    end
  end

  def check_definition(d)
    ids = d.components.map(&:id)
    raise Bug, "duplicate ids #{ids}" unless ids.uniq.size == ids.size
    raise Bug, "no source" if d.sources.empty?

    d.components.each do |c|
      raise Bug, "#{c.id}: argv #{c.argv.inspect}" unless c.argv.is_a?(Array) && !c.argv.empty? && c.argv.all?(String)
      raise Bug, "#{c.id}: env #{c.env.inspect}" unless c.env.all? { |k, v| k.match?(/\A[A-Za-z_]\w*\z/) && v.is_a?(String) && !v.include?("\0") }
      c.inputs.each do |i|
        up = d[i] or raise Bug, "#{c.id} reads from missing #{i}"
        raise Bug, "#{c.id} reads from sink #{i}" if up.sink?
      end
      raise Bug, "source #{c.id} has inputs" if c.source? && !c.inputs.empty?
    end
    topological(d)
  end

  # Every component can be ordered after its inputs: no cycle got through.
  def topological(d)
    done = {}
    pending = d.components.dup
    until pending.empty?
      ready = pending.select { |c| c.inputs.all? { |i| done[i] } }
      raise Bug, "cycle among #{pending.map(&:id)}" if ready.empty?

      ready.each { |c| done[c.id] = true }
      pending -= ready
    end
  end
end
