# frozen_string_literal: true

# The Ruby half of fuzz/descriptor_target.c (required from there, with the gem loaded).
module FuzzDescriptors
  ROOT = Module.new
  FRESH = Integer(ENV.fetch("FUZZ_DESC_FRESH", "20000"))
  @count = 0

  class << self
    # Loads bytes (moved into a namespace of its own while FRESH lasts); raises what the
    # load raised, or a RuntimeError (a bug) when what it defined does not work.
    def run(bytes)
      defined = Flowctl.load_descriptor_set(fresh(bytes), root: ROOT)
      defined.each_value { |obj| exercise(obj) }
      true
    end

    private

    def fresh(bytes)
      return bytes if @count >= FRESH

      set = begin
        Flowctl::Protobuf::FileDescriptorSet.decode(bytes)
      rescue Flowctl::DecodeError
        return bytes
      end
      @count += 1
      prefix = "fz#{@count}"
      set.file.each { |f| move(f, prefix) }
      set.to_proto
    rescue ArgumentError, TypeError, RangeError
      bytes # a value the setters refuse (the load will say what is wrong with it)
    end

    def move(file, prefix)
      file.name = "#{prefix}/#{file.name}"
      file.dependency = file.dependency.map { |d| "#{prefix}/#{d}" }
      file.package = file.package.to_s.empty? ? prefix : "#{prefix}.#{file.package}"
      each_field(file.message_type) { |f| f.type_name = rename(f.type_name, prefix) }
      file.service.each do |s|
        s[:method].each do |m|
          m.input_type = rename(m.input_type, prefix)
          m.output_type = rename(m.output_type, prefix)
        end
      end
    end

    def each_field(messages, &block)
      messages.each do |m|
        m.field.each(&block)
        each_field(m.nested_type, &block)
      end
    end

    def rename(name, prefix)
      return name if name.nil? || !name.start_with?(".") || name.start_with?(".google.protobuf.")

      ".#{prefix}#{name}"
    end

    def exercise(obj)
      case obj
      when Class
        msg = obj.new
        back = obj.decode(msg.to_proto)
        raise "#{obj}: a new message does not decode back equal" unless back == msg

        msg.inspect
        msg.to_h
      when Flowctl::Service
        obj.rpcs.each do |rpc|
          raise "#{obj.full_name}: #{rpc.name} has no message classes" unless rpc.request_class < Flowctl::Message
        end
      when Module
        raise "#{obj}: enum without values" if obj.values.empty?
      end
    end
  end
end
